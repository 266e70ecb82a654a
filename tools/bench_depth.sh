#!/usr/bin/env bash
# Cost against depth and width (issue 13): random-weight llama2.c models of chosen shapes
# (tools/make_random_llama2c.py), converted to TorchScript, then `gradq analyze` and, from that
# analysis, `gradq quantize` (search, validation, export) on the embedded TinyStories text, one
# thread. Prints one Markdown row per model and search measurement: CPU seconds of the analysis and
# of the search phase (process CPU time, from GNU time and the report) per quantizable weight, the
# blocks the search computed, peak RSS against the model's fp32 bytes, and the plan.
#
#   bash tools/bench_depth.sh                                  # depth: width 256, 4 8 16 32 layers
#   SHAPES="256x4 512x4 1024x4" bash tools/bench_depth.sh      # width
#   MEASURES="exact local" GRADQ=build/gradq WORK=/tmp/bd SEARCH="--max-kl 0.05" EXTRA="" bash tools/bench_depth.sh
#   EXTRA="--device cuda": the same on a GPU (tools/device_check.sh's scans step)
set -euo pipefail
cd "$(dirname "$0")/.."
gradq=${GRADQ:-build/gradq}
work=${WORK:-$(mktemp -d /tmp/gradq_bench_depth.XXXXXX)}
shapes=${SHAPES:-"256x4 256x8 256x16 256x32"}
measures=${MEASURES:-"exact local"}
extra=${EXTRA:-}
# Perplexity barely reacts to quantizing a random model (it even fell 8% at 2 bits per weight), so the
# search gets a KL budget. Trained rounding is left out: its cost is per weight whatever the depth
# (docs/BENCHMARKS.md, rounding), and under this budget it ran for most weights at 2 bits, hiding
# what the depth costs.
# The progressive search with clipped rounding is what the tables in docs/BENCHMARKS.md measured (the
# default became the allocator with GPTQ later): SEARCH="--search allocate --method gptq --max-kl 0.05" for that.
search=${SEARCH:---search progressive --method clip --max-kl 0.05 --no-trained-fallback}
mkdir -p "$work"
[ -x "$gradq" ] || { echo "bench_depth: $gradq not found (build first)" >&2; exit 1; }

# GNU time's report; where it is missing (the device tool's machine), the same three lines from Python.
timed() {
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v "$@"
  else
    python3 -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"User time (seconds): {r.ru_utime:.2f}\nSystem time (seconds): {r.ru_stime:.2f}\n"
      f"Maximum resident set size (kbytes): {r.ru_maxrss}", file=sys.stderr)
sys.exit(rc)' "$@"
  fi
}
cpu_of() { awk -F': ' '/User time/{u=$2} /System time/{s=$2} END{printf "%.1f", u+s}' "$1"; }
rss_of() { awk -F': ' '/Maximum resident/{printf "%.0f", $2/1024}' "$1"; }

echo "| width x layers | weights | analyze CPU s (per weight) | analyze RSS MiB | search | search CPU s (per weight) | blocks run / whole | validation CPU s (per weight), held-out passes | quantize CPU s (per weight) | quantize RSS MiB | model fp32 MiB | bits/weight | held-out PPL | held-out KL |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for shape in $shapes; do
  dim=${shape%x*}; layers=${shape#*x}
  bin=$work/r${dim}_l${layers}.bin; pt=$work/r${dim}_l${layers}.pt
  [ -f "$bin" ] || python3 tools/make_random_llama2c.py --dim "$dim" --layers "$layers" -o "$bin" > /dev/null
  [ -f "$pt" ] || "$gradq" convert "$bin" -o "$pt" > /dev/null
  weights=$((7 * layers))
  analysis_arg=() a_cpu=0 a_rss=-
  if [[ $search == *progressive* ]]; then  # only the progressive search reads an analysis
    analysis=$work/a_$shape.json
    if [ ! -f "$analysis" ]; then
      timed "$gradq" analyze --model "$pt" --threads 1 -o "$analysis" $extra > "$work/analyze_$shape.out" 2> "$work/analyze_$shape.time"
    fi
    analysis_arg=(--analysis "$analysis")
    a_cpu=$(cpu_of "$work/analyze_$shape.time") a_rss=$(rss_of "$work/analyze_$shape.time")
  fi
  for m in $measures; do
    report=$work/r_${shape}_$m.json
    timed "$gradq" quantize --model "$pt" --threads 1 "${analysis_arg[@]}" --search-measure "$m" \
      $search -o "$work/q_${shape}_$m.pt" --report "$report" $extra > "$work/quantize_${shape}_$m.out" 2> "$work/quantize_${shape}_$m.time" || true
    python3 - "$report" "$shape" "$weights" "$a_cpu" "$a_rss" \
      "$(rss_of "$work/quantize_${shape}_$m.time")" "$m" "$(cpu_of "$work/quantize_${shape}_$m.time")" <<'EOF'
import json, sys
report, shape, weights, a_cpu, a_rss, q_rss, m, q_cpu = sys.argv[1:]
r = json.load(open(report))
weights = int(weights)
def phase_cpu(name):
    return sum(p.get("cpu_seconds", 0) for p in r["phases"] if p["phase"] == name)
s_cpu, v_cpu, q_cpu = phase_cpu("search"), phase_cpu("validation"), float(q_cpu)
passes = max([v.get("pass", 0) for v in r.get("validation_steps", [])] or [0])
mem, h = r["memory"], r["heldout"]
w, l = shape.split("x")
print(f"| {w} x {l} | {weights} | {float(a_cpu):.1f} ({float(a_cpu) / weights:.2f}) | {a_rss} | {m} | "
      f"{s_cpu:.1f} ({s_cpu / weights:.2f}) | {r['search']['blocks_run']} / {r['search']['blocks_whole']} | "
      f"{v_cpu:.1f} ({v_cpu / weights:.2f}), {passes} | {q_cpu:.1f} ({q_cpu / weights:.2f}) | {q_rss} | "
      f"{mem['fp32_bytes'] / 2**20:.0f} | {mem['bits_per_weight']:.3f} | {100 * (h['ppl_ratio']['value'] - 1):+.2f}% | "
      f"{h['kl']['mean']['value']:.4f} |")
EOF
  done
done
echo "(work files in $work)"
