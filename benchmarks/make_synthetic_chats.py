#!/usr/bin/env python
"""Write synthetic multi-turn chat records (OpenAI ``messages``) of a wide length mix to JSONL.

    python benchmarks/make_synthetic_chats.py --out chats.jsonl --records 400 [--max-turns 12] [--seed 0]
    python benchmarks/make_synthetic_chats.py --out long.jsonl --records 64 --min-words 24700 \
        --max-total-words 31100 --max-turns 40      # agent-trajectory-like records of 24.7-31.1K words

For throughput runs and packing studies when no real data is at hand (the GPU box is offline).
Turn texts are random words, so token counts depend on the tokenizer: the tiny tokenizer
(``megatron_sft.testing.tiny_tokenizer``) makes about 4.0 tokens a word, so 24.7-31.1K words are
about 100-126K tokens (``benchmarks/bench_vs_hf.py`` measures the ratio before choosing lengths).

With ``--min-words N`` every record holds between N and ``--max-total-words`` words in all (drawn
uniformly), spread over 20-``--max-turns`` user/assistant turn pairs of uneven length; without it
(the default) turn lengths are heavy-tailed and each record is as long as its turns happen to be.
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = ("the model answers each question with care and cites the tool output when it is useful "
         "data packing attention tokens sequence parallel gradient loss batch python function value "
         "result error retry plan step first then finally because therefore example").split()


def make_record(rng: random.Random, max_turns: int, max_words: int) -> dict:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for _ in range(rng.randint(1, max_turns)):
        for role in ("user", "assistant"):
            n = int(rng.paretovariate(1.2) * 8) % max_words + 1
            messages.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(n))})
    return {"messages": messages}


def split_words(rng: random.Random, total_words: int, num_messages: int) -> list[int]:
    """``num_messages`` word counts, each >= 1, of uneven size, summing to ``total_words``."""
    weights = [rng.paretovariate(1.5) for _ in range(num_messages)]
    spare = total_words - num_messages
    counts = [1 + int(spare * w / sum(weights)) for w in weights]
    counts[-1] += total_words - sum(counts)  # rounding remainder (>= 0) goes to the last turn
    return counts


def make_long_record(rng: random.Random, min_words: int, max_total_words: int, max_turns: int) -> dict:
    """One long conversation (an agent trajectory's shape): ``min_words``..``max_total_words``
    words in all over 20..max_turns user/assistant pairs."""
    total = rng.randint(min_words, max(min_words, max_total_words))
    num_turns = rng.randint(min(20, max_turns), max_turns)
    messages = [{"role": "system", "content": "You are a helpful agent."}]
    for i, n in enumerate(split_words(rng, total, 2 * num_turns)):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(n))})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--max-turns", type=int, default=12)
    parser.add_argument("--max-words", type=int, default=1500, help="most words in one turn (default mode)")
    parser.add_argument("--min-words", type=int, default=0,
                        help="long mode: fewest words in a whole record (0 = default mode)")
    parser.add_argument("--max-total-words", type=int, default=None,
                        help="long mode: most words in a whole record (default: --min-words)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.min_words and args.min_words < 2 * args.max_turns:
        parser.error(f"--min-words {args.min_words} must be at least 2 x --max-turns = {2 * args.max_turns}")
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.records):
            if args.min_words:
                record = make_long_record(rng, args.min_words, args.max_total_words or args.min_words, args.max_turns)
            else:
                record = make_record(rng, args.max_turns, args.max_words)
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
