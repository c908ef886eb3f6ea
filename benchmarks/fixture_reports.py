#!/usr/bin/env python
"""Preprocess the fixture datasets (../shared/fixtures) with every fixture tokenizer and print one
summary per tokenizer from the compiler's own report: records kept, dropped per reason, supervised
tokens per role, fill ratio, tokens/s.

    python benchmarks/fixture_reports.py [--seq-length 16384] [--out /tmp/fixture_reports]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
DATASETS = ["axolotl_conversation.json", "axolotl_conversation.missingturns.json",
            "llamafactory_glaive_toolcall_en_demo.json", "llamafactory_reason_tool_use_demo_50.jsonl",
            "openai_cookbook_toy_chat_fine_tuning.jsonl"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--out", default="/tmp/fixture_reports")
    args = parser.parse_args()
    if not FIXTURES.is_dir():
        print(f"no fixtures at {FIXTURES}", file=sys.stderr)
        return 1
    inputs = ",".join(str(FIXTURES / "datasets" / name) for name in DATASETS)
    for tokenizer in sorted(p for p in (FIXTURES / "tokenizers").iterdir() if p.is_dir()):
        prefix = Path(args.out) / tokenizer.name
        # Template-only folders (Llama-3, Gemma-2): the template on the Qwen2.5 tokenizer (SOURCES.md).
        template_only = not any((tokenizer / f).exists() for f in ("tokenizer.json", "vocab.json"))
        load = FIXTURES / "tokenizers" / "qwen2.5-instruct" if template_only else tokenizer
        cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", inputs, "--tokenizer",
               str(load), "--output-prefix", str(prefix), "--seq-length", str(args.seq_length),
               "--on-error", "skip", "--no-progress", "--overwrite"]
        if template_only:
            cmd += ["--chat-template", str(tokenizer / "chat_template.jinja")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(f"{tokenizer.name}: preprocess_data.py failed ({proc.returncode}): {proc.stderr[-500:]}")
            continue
        r = json.loads(Path(f"{prefix}.report.json").read_text())
        dropped = {reason: v["records"] for reason, v in r["dropped"].items()}
        name = f"{tokenizer.name} template on qwen2.5-instruct" if template_only else tokenizer.name
        print(f"{name}: read {r['records_read']}, kept {r['records_kept']}, dropped {dropped}, "
              f"truncated {r['truncated']}, supervised {r['supervised_tokens']['by_role']}, packs {r['packs']}, "
              f"fill {100 * r['fill_ratio']:.1f}%, {r['tokens_per_s'] / 1000:.0f}K tok/s (incl. start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
