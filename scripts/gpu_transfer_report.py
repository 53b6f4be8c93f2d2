#!/usr/bin/env python3
"""Transfer across SKUs from the tables `gpu_measure` printed for the bundles of
scripts/gpu_transfer_pack.sh (DIR/MODEL.P.{transfer,cold}.txt): per model and precision, the
sum of the tasks' default times over the sum of their best times, for candidates ranked by
the cost model trained on another SKU's records (transfer) and for random ones (cold).
Usage: gpu_transfer_report.py DIR"""
import glob, os, sys


def sums(path):
    """(tasks, sum of default us, sum of best us) of one bundle's table."""
    n = d = b = 0.0
    for line in open(path):
        c = [x.strip() for x in line.strip().strip('|').split('|')]
        if len(c) < 6:
            continue
        try:
            dd, bb = float(c[3]), float(c[4])
        except ValueError:
            continue
        n, d, b = n + 1, d + dd, b + bb
    return int(n), d, b


rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], '*.txt'))):
    name = os.path.basename(f)[:-4]
    base, _, kind = name.rpartition('.')
    if kind in ('transfer', 'cold'):
        rows.setdefault(base, {})[kind] = sums(f)
print('| model.precision | tasks | default sum us | transfer: best sum us (speed-up) | cold: best sum us (speed-up) |')
print('|---|---|---|---|---|')
tot = {'transfer': [0.0, 0.0], 'cold': [0.0, 0.0]}
for base, r in rows.items():
    cells = []
    both = all(k in r and r[k][2] > 0 for k in ('transfer', 'cold'))
    for kind in ('transfer', 'cold'):
        if kind in r and r[kind][2] > 0:
            n, d, b = r[kind]
            cells.append(f'{b:.1f} ({d / b:.2f}x)')
            if both:  # the total compares the two on the same bundles
                tot[kind][0] += d
                tot[kind][1] += b
        else:
            cells.append('-')
    n, d, _ = r.get('transfer', r.get('cold'))
    print(f'| {base} | {n} | {d:.1f} | {cells[0]} | {cells[1]} |')
print('| all with both | | | ' + ' | '.join(f'{t[0] / t[1]:.2f}x' if t[1] else '-' for t in tot.values()) + ' |')
