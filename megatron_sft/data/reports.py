"""The compiler's ``PREFIX.report.json``: counts filled record by record, the report, its summary
for a person, and the merge of the reports of a sharded run (``tools/merge_reports.py``).

Every count is additive over shards: a sharded run (``--shard-index i --num-shards N``) gives
each record to one shard, so summing the shards' counts gives the unsharded run's (packs and
fill excepted: each shard packs its own conversations).
"""

from __future__ import annotations

import json
import os

from megatron_sft.errors import InputError, SFTError

MAX_EXAMPLES_PER_REASON = 20
SKIP_HINT = "pass --on-error skip to drop such records (counted by reason in PREFIX.report.json)"


class CompileError(SFTError, RuntimeError):
    """A run that must stop: the first bad record under on_error="fail" (message
    ``path:line: reason: detail; fix``), an unusable tokenizer or chat template, nothing left to write."""


class Tally:
    """Counts of one run, filled record by record; ``drop`` raises under on_error="fail"."""

    def __init__(self, on_error: str, num_sources: int):
        self.on_error = on_error
        self.dropped: dict[str, dict] = {}
        self.records_kept = 0
        self.num_conversations = 0
        self.num_truncated = 0
        self.real_tokens = 0
        self.encoded_tokens = 0
        self.supervised_by_role: dict[str, int] = {}
        self.per_source = [
            {"records_kept": 0, "records_dropped": 0, "conversations": 0, "real_tokens": 0, "supervised_tokens": 0}
            for _ in range(num_sources)
        ]
        self.reasoning_not_rendered = {"records": 0, "turns": 0, "examples": []}
        self.mixture: list[dict] = []
        self.pseudo_multiturn: dict | None = None

    def drop(self, source_index: int, num_records: int, location: str, reason: str, detail: str, fix: str = "") -> None:
        """Count a dropped record under ``reason``; under on_error="fail" raise CompileError with
        the location, the reason, the detail and the fix (``fix``, else the --on-error skip hint)."""
        if self.on_error == "fail":
            raise CompileError(f"{location}: {reason}: {detail}; {fix or SKIP_HINT}")
        entry = self.dropped.setdefault(reason, {"records": 0, "examples": []})
        entry["records"] += num_records
        if len(entry["examples"]) < MAX_EXAMPLES_PER_REASON:
            entry["examples"].append(f"{location}: {detail}")
        self.per_source[source_index]["records_dropped"] += num_records

    def keep(self, source_index: int, num_records: int, num_tokens: int, supervised: int,
             by_role: dict[str, int], truncated: bool) -> None:
        if truncated:
            # The masker counted roles over the whole conversation; after the cut only a
            # single-role count can be re-attributed exactly.
            by_role = {next(iter(by_role)): supervised} if len(by_role) == 1 else {"unknown (truncated)": supervised}
            self.num_truncated += 1
        for role, count in by_role.items():
            self.supervised_by_role[role] = self.supervised_by_role.get(role, 0) + int(count)
        self.records_kept += num_records
        self.num_conversations += 1
        self.real_tokens += num_tokens
        source = self.per_source[source_index]
        source["records_kept"] += num_records
        source["conversations"] += 1
        source["real_tokens"] += num_tokens
        source["supervised_tokens"] += supervised

    def reasoning_dropped(self, num_records: int, num_turns: int, location: str) -> None:
        """A kept conversation with ``num_turns`` assistant turns whose reasoning is not rendered."""
        entry = self.reasoning_not_rendered
        entry["records"] += num_records
        entry["turns"] += num_turns
        if len(entry["examples"]) < MAX_EXAMPLES_PER_REASON:
            entry["examples"].append(location)


def build_report(config, tally: Tally, records_read: list[int], records_used: list[int], stats,
                 timing: dict[str, float]) -> dict:
    """The ``.report.json`` content. ``config``: the CompileConfig; ``records_read``/``records_used``:
    per source, this shard's records before/after mixture sampling; ``stats``: packing.PackingStats
    (None before packing); ``timing``: seconds per stage, ``total_s`` included."""
    mixture = []
    for s, path in enumerate(config.inputs):
        source = tally.per_source[s]
        share = source["real_tokens"] / tally.real_tokens if tally.real_tokens else 0.0
        ratio = tally.mixture[s]["ratio"] if s < len(tally.mixture) else 1.0
        mixture.append({"source_index": s, "path": path, "ratio": ratio, "records_read": records_read[s],
                        "records_used": records_used[s], **source, "token_share": round(share, 6)})
    elapsed_s = timing.get("total_s", 0.0)
    return {
        "output_prefix": config.shard_output_prefix(),
        "shard": {"index": config.shard_index, "count": config.num_shards} if config.num_shards > 1 else None,
        "records_read": sum(records_read),
        "records_used": sum(records_used),
        "records_kept": tally.records_kept,
        "records_dropped": sum(e["records"] for e in tally.dropped.values()),
        "dropped": dict(sorted(tally.dropped.items())),
        "truncated": tally.num_truncated,
        "reasoning_not_rendered": tally.reasoning_not_rendered,
        "conversations": tally.num_conversations,
        "packs": stats.num_packs if stats else 0,
        "seq_length": config.seq_length,
        "real_tokens": tally.real_tokens,
        "encoded_tokens": tally.encoded_tokens,
        "supervised_tokens": {
            "total": sum(m["supervised_tokens"] for m in mixture),
            "by_role": dict(sorted(tally.supervised_by_role.items())),
            "by_source": [m["supervised_tokens"] for m in mixture],
        },
        "fill_ratio": round(stats.fill_ratio, 6) if stats else 0.0,
        "mixture": mixture,
        "pseudo_multiturn": tally.pseudo_multiturn,
        "workers": config.workers,
        "elapsed_s": round(elapsed_s, 3),
        "tokens_per_s": round(tally.encoded_tokens / elapsed_s, 1) if elapsed_s > 0 else None,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }


def reasoning_warning(report: dict) -> str | None:
    """One sentence when the template left supplied reasoning out of kept conversations."""
    entry = report.get("reasoning_not_rendered") or {}
    if not entry.get("turns"):
        return None
    return (f"{entry['turns']} assistant turn(s) in {entry['records']} record(s) carry reasoning_content that the chat "
            f"template does not render (e.g. {entry['examples'][0]}): that reasoning is in neither the tokens nor the "
            "loss. Use a template that renders it (--chat-template FILE) if it should be trained on; templates like "
            "Qwen3's render only the reasoning after the last user message, by design.")


def format_summary(report: dict) -> str:
    """A few lines for a person: what was kept, what was dropped and why, how full the packs are."""
    lines = [
        f"records: {report['records_read']} read, {report['records_used']} used after mixing, "
        f"{report['records_kept']} kept, {report['records_dropped']} dropped, {report['truncated']} truncated",
        f"packs: {report['packs']} x {report['seq_length']} tokens, {report['conversations']} conversations, "
        f"{report['real_tokens']} real tokens, fill {100 * report['fill_ratio']:.2f}%",
        f"supervised tokens: {report['supervised_tokens']['total']} "
        + " ".join(f"{r}={n}" for r, n in report["supervised_tokens"]["by_role"].items()),
    ]
    for reason, entry in report["dropped"].items():
        lines.append(f"dropped {reason}: {entry['records']} (e.g. {entry['examples'][0]})")
    reasoning = report.get("reasoning_not_rendered") or {}
    if reasoning.get("turns"):
        lines.append(f"reasoning not rendered by the template: {reasoning['turns']} turns in {reasoning['records']} "
                     f"records (e.g. {reasoning['examples'][0]})")
    if report.get("tokens_per_s") is not None:
        lines.append(f"{report['tokens_per_s']:.0f} tokens/s with {report['workers']} worker(s), {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------- sharded runs


_SUMMED = ("records_read", "records_used", "records_kept", "records_dropped", "truncated", "conversations",
           "packs", "real_tokens", "encoded_tokens")
_SUMMED_PER_SOURCE = ("records_read", "records_used", "records_kept", "records_dropped", "conversations",
                      "real_tokens", "supervised_tokens")


def shard_prefix(prefix: str, shard_index: int) -> str:
    """Output prefix of shard ``shard_index``: ``PREFIX_shard3``."""
    return f"{prefix}_shard{shard_index}"


def read_shard_reports(prefix: str) -> list[dict]:
    """The reports of every shard of ``prefix`` (``PREFIX_shard{i}.report.json``), in shard order;
    ValueError naming the missing or inconsistent files."""
    first = f"{shard_prefix(prefix, 0)}.report.json"
    if not os.path.exists(first):
        raise InputError(f"{first} not found: is {prefix} the --output-prefix of a sharded run "
                         "(tools/preprocess_data.py --num-shards N), and did shard 0 finish?")
    reports = [_load_report(first)]
    count = (reports[0].get("shard") or {}).get("count")
    if not isinstance(count, int) or count < 1:
        raise InputError(f"{first} is not the report of a shard (no 'shard' entry): nothing to merge")
    missing = [f"{shard_prefix(prefix, i)}.report.json" for i in range(1, count)
               if not os.path.exists(f"{shard_prefix(prefix, i)}.report.json")]
    if missing:
        raise InputError(f"{len(missing)} of {count} shard reports missing (did those array tasks fail?): "
                         + ", ".join(missing))
    reports += [_load_report(f"{shard_prefix(prefix, i)}.report.json") for i in range(1, count)]
    return reports


def _load_report(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable report: {err}") from None


def merge_reports(reports: list[dict]) -> dict:
    """One report for the shards of a run: counts summed, drop reasons merged (examples kept up
    to MAX_EXAMPLES_PER_REASON), fill recomputed over all packs, ``train_prefix`` listing the shard
    prefixes in order. ValueError when the reports are not the N shards of one run."""
    _check_shards(reports)
    merged = {key: sum(r[key] for r in reports) for key in _SUMMED}
    first = reports[0]
    seq_length = first["seq_length"]
    dropped: dict[str, dict] = {}
    for report in reports:
        for reason, entry in report["dropped"].items():
            into = dropped.setdefault(reason, {"records": 0, "examples": []})
            into["records"] += entry["records"]
            into["examples"] = (into["examples"] + entry["examples"])[:MAX_EXAMPLES_PER_REASON]
    mixture = [dict(m) for m in first["mixture"]]
    for m in mixture:
        s = m["source_index"]
        for key in _SUMMED_PER_SOURCE:
            m[key] = sum(r["mixture"][s][key] for r in reports)
        m["token_share"] = round(m["real_tokens"] / merged["real_tokens"], 6) if merged["real_tokens"] else 0.0
    by_role: dict[str, int] = {}
    for report in reports:
        for role, count in report["supervised_tokens"]["by_role"].items():
            by_role[role] = by_role.get(role, 0) + count
    elapsed = [r["elapsed_s"] for r in reports]
    prefixes = [r["output_prefix"] for r in reports]
    return {
        "output_prefix": os.path.commonprefix(prefixes).rsplit("_shard", 1)[0],
        "shard": {"count": len(reports), "merged": True},
        **merged,
        "records_dropped": sum(e["records"] for e in dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "reasoning_not_rendered": _merge_reasoning(reports),
        "seq_length": seq_length,
        "supervised_tokens": {
            "total": sum(r["supervised_tokens"]["total"] for r in reports),
            "by_role": dict(sorted(by_role.items())),
            "by_source": [m["supervised_tokens"] for m in mixture],
        },
        "fill_ratio": round(merged["real_tokens"] / (merged["packs"] * seq_length), 6) if merged["packs"] else 0.0,
        "mixture": mixture,
        "pseudo_multiturn": _merge_counts([r["pseudo_multiturn"] for r in reports]),
        "workers": first["workers"],
        "elapsed_s": max(elapsed),
        "elapsed_s_sum": round(sum(elapsed), 3),
        "tokens_per_s": round(merged["encoded_tokens"] / max(elapsed), 1) if max(elapsed) > 0 else None,
        "train_prefix": prefixes,
    }


def _check_shards(reports: list[dict]) -> None:
    problems = []
    if not reports:
        raise InputError("no shard reports to merge")
    count = len(reports)
    for i, report in enumerate(reports):
        shard = report.get("shard") or {}
        where = report.get("output_prefix", f"report {i}")
        if shard.get("index") != i or shard.get("count") != count:
            problems.append(f"{where}: is shard {shard.get('index')} of {shard.get('count')}, expected shard {i} of {count}")
        if report.get("seq_length") != reports[0].get("seq_length"):
            problems.append(f"{where}: seq_length {report.get('seq_length')} differs from shard 0's "
                            f"{reports[0].get('seq_length')}")
        paths = [(m["path"], m["ratio"]) for m in report.get("mixture", [])]
        if paths != [(m["path"], m["ratio"]) for m in reports[0].get("mixture", [])]:
            problems.append(f"{where}: inputs/mixture ratios differ from shard 0's")
    if problems:
        raise InputError("these reports are not the shards of one run:\n  " + "\n  ".join(problems))


def _merge_reasoning(reports: list[dict]) -> dict:
    out = {"records": 0, "turns": 0, "examples": []}
    for report in reports:
        entry = report.get("reasoning_not_rendered") or {}
        out["records"] += entry.get("records", 0)
        out["turns"] += entry.get("turns", 0)
        out["examples"] = (out["examples"] + entry.get("examples", []))[:MAX_EXAMPLES_PER_REASON]
    return out


def _merge_counts(entries: list[dict | None]) -> dict | None:
    present = [e for e in entries if e is not None]
    if not present:
        return None
    return {key: sum(e[key] for e in present) for key in present[0]}
