#!/usr/bin/env python
"""Write synthetic multi-turn chat records (OpenAI ``messages``) of a wide length mix to JSONL.

    python benchmarks/make_synthetic_chats.py --out chats.jsonl --records 400 [--max-turns 12] [--seed 0]

For throughput runs and packing studies when no real data is at hand (the GPU box is offline).
Turn texts are random words, so token counts depend on the tokenizer.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--max-turns", type=int, default=12)
    parser.add_argument("--max-words", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.records):
            f.write(json.dumps(make_record(rng, args.max_turns, args.max_words)) + "\n")


if __name__ == "__main__":
    main()
