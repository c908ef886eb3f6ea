"""Benchmark: ChatMasker.encode vs plain apply_chat_template(tokenize=True), per conversation.

    python benchmarks/bench_chat_masks.py [--tokenizer DIR] [--chat-template FILE] [--repeats N]

Prints tokens/s and the cost ratio (masker / plain) for 2-turn and 32-turn chats and a 100-turn
agent trajectory (built from the SWE-agent fixture when present, else synthetic); a name ending in
``*`` was measured without its system message (the template refuses a system role). Times are
the best of N interleaved samples (time.perf_counter), single process (one core)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from megatron_sft.data.chat_masks import ChatMasker, MaskError

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def chat(num_turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for t in range(num_turns):
        messages.append({"role": "user", "content": f"Question {t}: what is {t} + {t}? Explain briefly."})
        messages.append({"role": "assistant", "content": f"{t} + {t} = {2 * t}. Adding a number to itself doubles it."})
    return messages


def agent_trajectory(num_turns: int) -> list[dict]:
    path = FIXTURES / "datasets" / "sweagent_marshmallow-code__marshmallow-1867.function_calling_replace_from_source.traj.json"
    steps = []
    if path.exists():
        history = json.loads(path.read_text())["history"]
        head = [{"role": m["role"], "content": m["content"]} for m in history[:2]]
        for k, m in enumerate(history[2:]):
            out = {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else ""}
            call_id = f"call{k // 2:05d}"  # 9 characters, as Mistral's template demands
            if m["role"] == "assistant" and m.get("action"):
                out["tool_calls"] = [{"type": "function", "id": call_id,
                                      "function": {"name": "bash", "arguments": {"command": m["action"]}}}]
            elif m["role"] == "tool":
                out["tool_call_id"] = call_id
            steps.append(out)
    else:
        head = chat(0) + [{"role": "user", "content": "Fix the bug in utils.py."}]
        steps = [{"role": "assistant", "content": "Let me look.", "tool_calls": [{"type": "function", "function": {"name": "bash", "arguments": {"command": "cat utils.py"}}}]},
                 {"role": "tool", "content": "def f(x):\n    return x + 1\n" * 40}]
    body = []
    while sum(m["role"] == "assistant" for m in body) < num_turns:
        body.extend(steps)
    return head + body


def best_times(fns, repeats: int, min_seconds: float = 0.05, clock=time.perf_counter) -> list[float]:
    """Best-of-``repeats`` seconds per call of each function, interleaved so that load from
    other processes hits all of them alike; each sample loops until ``min_seconds``."""
    loops = []
    for fn in fns:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            fn()
            n += 1
        loops.append(n)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = clock()
            for _ in range(loops[k]):
                fn()
            best[k] = min(best[k], (clock() - start) / loops[k])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(FIXTURES / "tokenizers" / "qwen2.5-instruct"))
    parser.add_argument("--chat-template", default=None, help="a .jinja file to use instead of the tokenizer's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["perf_counter", "process_time"], default="perf_counter",
                        help="process_time (CPU time of this process) is steadier on a shared machine")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.chat_template:
        tok.chat_template = Path(args.chat_template).read_text()
    cases = {"chat_2_turns": chat(2), "chat_32_turns": chat(32), "agent_100_turns": agent_trajectory(100)}
    for name, messages in cases.items():
        masker = ChatMasker(tok)
        try:
            masker.encode(messages)  # warm caches (template facts, render check), as in a long compile run
        except MaskError as err:
            if err.reason != "template_error" or messages[0]["role"] != "system":
                print(f"{name:16s} refused: {err}")
                continue
            # Templates without a system role (Gemma) raise on it: measure the rest of the chat.
            messages, name = messages[1:], f"{name}*"
            try:
                masker.encode(messages)
            except MaskError as err:
                print(f"{name:16s} refused: {err}")
                continue
        plain, ours = best_times([lambda: tok.apply_chat_template(messages, tokenize=True, return_dict=False),
                                  lambda: masker.encode(messages)], args.repeats, clock=getattr(time, args.clock))
        num_tokens = len(masker.encode(messages).input_ids)
        print(f"{name:16s} tokens={num_tokens:7d} plain={plain * 1e3:8.2f} ms masker={ours * 1e3:8.2f} ms "
              f"ratio={ours / plain:4.2f}x  masker={num_tokens / ours / 1e3:7.1f}K tok/s  "
              f"per_turn={ours / max(1, sum(m['role'] == 'assistant' for m in messages)) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
