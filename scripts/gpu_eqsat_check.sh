#!/usr/bin/env bash
# Issue 4 on a GPU machine (no compiler there): unpacks .gpu/eqsat.tar.xz (made by
# scripts/gpu_eqsat_pack.sh) and runs each artifact with the runtime-only gpu_zoo, one
# process per artifact (checked against the interpreter's output, then timed: median of
# RUNS, default 100; at most EQSAT_TIMEOUT s each, default 300), and prints the measured -O2 over -O0 speed-up per graph beside
# tensat's (MLSys'21, V100). The table also lands in $OUT/eqsat.txt when OUT is set.
# PROFILE_GRAPHS="nasrnn bert": then the device time of each launch of those graphs'
# artifacts (KILN_PROFILE, 10 runs) into $OUT/eqsat_profile.txt.
set -uo pipefail
OUT=${OUT:-/tmp/kiln_gpu_out}; mkdir -p "$OUT"
RUNS=${1:-100}
D=$(mktemp -d)
python3 -c "import lzma,tarfile,sys; tarfile.open(fileobj=lzma.open('.gpu/eqsat.tar.xz')).extractall(sys.argv[1])" "$D"
export KILN_CUBIN_CACHE=/tmp/kiln_cubin
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cat "$D/eqsat/pack.log" | grep -E "O2|kept" | sed 's/^/pack: /'
{ echo "| artifact | launches | load ms (JIT / cached) | max rel. error | p50 ms | min ms |"; echo "|---|---|---|---|---|---|"
  for f in "$D"/eqsat/*.kiln; do
    timeout "${EQSAT_TIMEOUT:-300}" .gpu/bin/gpu_zoo "$D/eqsat" "$RUNS" "$(basename "$f")" 2>&1; rc=$?
    [ $rc = 0 ] || echo "| $(basename "$f") | exit $rc |"
  done; } | tee "$OUT/eqsat_raw.txt"
python3 - "$OUT/eqsat_raw.txt" <<'PY' | tee "$OUT/eqsat.txt"
import re, sys
tensat = {'bert': '9.2%', 'resnext50': '8.8%', 'nasnet': '7.3%', 'nasrnn': '68.9%',
          'inception': '10.0%', 'squeezenet': '24.5%', 'vgg19': '8.9%', 'gpt2': '-'}
p50 = {}
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    m = re.match(r'(\w+)\.(O\d)\.kiln$', cells[0]) if cells else None
    if m and len(cells) >= 6:
        try:
            p50[(m.group(1), m.group(2))] = (float(cells[4]), cells[3])
        except ValueError:
            pass
print('| graph | -O0 p50 ms | -O2 p50 ms | measured speed-up | max rel. error (-O0 / -O2) | tensat |')
print('|---|---|---|---|---|---|')
for g in sorted({k[0] for k in p50}):
    a = p50.get((g, 'O0'))
    b = p50.get((g, 'O2'), a)  # no -O2 artifact: eqsat kept the input graph
    if a is None:
        continue
    same = (g, 'O2') not in p50
    sp = 'same graph' if same else f'{100 * (a[0] / b[0] - 1):+.1f}%'
    print(f'| {g} | {a[0]:.3f} | {b[0]:.3f} | {sp} | {a[1]} / {b[1]} | {tensat.get(g, "-")} |')
PY
for g in ${PROFILE_GRAPHS:-}; do
  for f in "$D"/eqsat/"$g".O*.kiln; do
    [ -f "$f" ] || continue
    KILN_PROFILE=10 timeout "${EQSAT_TIMEOUT:-300}" .gpu/bin/gpu_zoo "$D/eqsat" 10 "$(basename "$f")" 2>&1
  done
done | tee "$OUT/eqsat_profile.txt"
rm -rf "$D"
