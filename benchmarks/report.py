"""Turn a pytest-benchmark JSON file into a markdown table of median times and speed ratios.

    python benchmarks/report.py results.json

For every group, each role's median is listed with ``baseline median / role median`` (how many
times faster than the baseline; > 1 is faster).
"""
import json
import sys
from collections import defaultdict


def ratio_table(path: str) -> str:
    with open(path) as handle:
        data = json.load(handle)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["extra_info"].get("role", bench["name"])] = bench["stats"]["median"]
    lines = ["| group | role | median | speed-up vs baseline |", "|---|---|---|---|"]
    for group in sorted(groups, key=str):  # benchmarks without a group sort as "None"
        roles = groups[group]
        baseline = roles.get("baseline")
        for role, median in sorted(roles.items(), key=lambda item: item[0] != "ours"):
            ratio = f"{baseline / median:.2f}×" if baseline and role != "baseline" else "—"
            lines.append(f"| {group} | {role} | {_format(median)} | {ratio} |")
    machine = data.get("machine_info", {})
    header = f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cpus; date: {data.get('datetime', '?')}"
    return header + "\n\n" + "\n".join(lines)


def _format(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py BENCHMARK.json")
    print(ratio_table(sys.argv[1]))
