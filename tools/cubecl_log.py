#!/usr/bin/env python3
"""Sums up a CubeCL debug log (`CUBECL_DEBUG_LOG=FILE`): where a run's GPU time went.

    python3 tools/cubecl_log.py FILE [--top N]

The log is what CubeCL 0.11 writes with `CUBECL_DEBUG_LOG` set (compilation, autotune and
profiling loggers, read from a lavapipe run's log):
- a kernel launch timed by the profiler: `| 2.48ms | ElemwiseFuse_f0676a55` (name, `_` and a
  hash of its configuration; matmul names are `|`-joined type lists);
- a compilation: `[START_KERNEL_COMPILATION]`, then `name: <type path>`, its source, `[END_...]`;
- an autotune: ` - Tuning: <candidate> (compilation & bench: 100.99ms)` per candidate tried,
  `Fastest result <candidate>-<key>` for the winner, `Short circuiting autotune. ...`.
Profiler summary tables (`| Name | Duration | ...`) repeat the launch lines and are skipped.

Prints: kernel time by kernel (and by family, the hash dropped), autotune time by candidate,
the winners, and the kernels compiled by type. The last lines of the log that are not kernel
source, too: in a run that was stopped (a stall), they say what it was doing.
"""
import collections
import re
import sys

UNIT = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
DURATION = r"([\d.]+)(ns|µs|us|ms|s)"
LAUNCH = re.compile(r"^\| " + DURATION + r"\s*\| (.+?)\s*$")
TUNING = re.compile(r"^ - Tuning: (\S+) \(compilation & bench: " + DURATION + r"\)")
FASTEST = re.compile(r"^Fastest result (\S+?)-[A-Z]\w*Key")


def seconds(value, unit):
    return float(value) * UNIT[unit]


def short(name, width=110):
    return name if len(name) <= width else name[: width // 2 - 2] + " .. " + name[-(width // 2 - 2):]


def main():
    path = sys.argv[1]
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 25
    kernel, launches = collections.Counter(), collections.Counter()
    family = collections.Counter()
    tuning, tried, winners = collections.Counter(), collections.Counter(), collections.Counter()
    compiled = collections.Counter()
    short_circuits = 0
    tail = collections.deque(maxlen=40)
    in_source, want_name = False, False
    block, last_block = [], []
    try:
        log = open(path, errors="replace")
    except OSError as e:
        print(f"no CubeCL log: {e} (a run on burn's CPU backend writes none)")
        return
    with log:
        for line in log:
            line = line.rstrip("\n")
            if line.startswith("[START_KERNEL_COMPILATION]"):
                in_source, want_name, block = True, True, []
                continue
            if line.startswith("[END_KERNEL_COMPILATION]"):
                in_source = False
                continue
            if in_source:
                if want_name and line.startswith("name: "):
                    compiled[line[6:].split("<")[0].strip()] += 1
                    want_name = False
                if len(block) < 200:
                    block.append(line)
                    last_block = block
                continue
            if line.strip():
                tail.append(line[:200])
            m = LAUNCH.match(line)
            if m:
                t = seconds(m.group(1), m.group(2))
                kernel[m.group(3)] += t
                launches[m.group(3)] += 1
                family[re.sub(r"_[0-9a-f]{8}$", "", m.group(3))] += t
                continue
            m = TUNING.match(line)
            if m:
                tuning[m.group(1)] += seconds(m.group(2), m.group(3))
                tried[m.group(1)] += 1
                continue
            m = FASTEST.match(line)
            if m:
                winners[m.group(1)] += 1
            elif line.startswith("Short circuiting autotune."):
                short_circuits += 1

    print(f"== kernel time (profiler): {sum(kernel.values()):.3f} s in {sum(launches.values())} launches of {len(kernel)} kernels")
    for name, t in kernel.most_common(top):
        print(f"{t:9.4f} s {launches[name]:6d}x  {short(name)}")
    print(f"== kernel time by family (configurations summed): {len(family)} families")
    for name, t in family.most_common(top):
        print(f"{t:9.4f} s  {short(name)}")
    print(f"== autotune: {sum(tuning.values()):.3f} s compiling and benchmarking {sum(tried.values())} candidates "
          f"over {sum(winners.values())} keys ({short_circuits} short-circuited)")
    for name, t in tuning.most_common(top):
        print(f"{t:9.4f} s {tried[name]:5d}x tried {winners[name]:4d}x won  {name}")
    print(f"== kernels compiled: {sum(compiled.values())}")
    for name, n in compiled.most_common(top):
        print(f"{n:6d}  {short(name)}")
    if last_block:
        # What the run compiled last: in a stopped run, the kernel it was compiling or running.
        text = "\n".join(last_block)
        name = text.split("\nid:")[0]
        generic = {"DynamicScalar", "DynamicSize", "TensorArgs"}
        types = [t for t in dict.fromkeys(re.findall(r"::([A-Z]\w+)", name)) if t not in generic]
        settings = dict.fromkeys(re.findall(r"\b(tile_matmul|partition_buffering|plane_dim|specialization\w*): ([\w{]+)", text))
        print("== the last kernel compiled: " + " ".join(types[:12]))
        print("   " + ", ".join(f"{k}: {v}" for k, v in settings))
    print("== the log's last lines (no kernel source)")
    print("\n".join(tail))


if __name__ == "__main__":
    main()
