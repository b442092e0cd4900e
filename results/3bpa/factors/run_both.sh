#!/usr/bin/env bash
# A/B: grid_chain with factor weights per channel (shared by the elements) vs per (element, channel);
# one run of each at a time (jobs=1 each, both compares concurrently), so every run shares the 2 cores alike.
cd "$(dirname "$0")/../../.."
export MACE_GRID_DATA="${MACE_GRID_DATA:-$(cd ../shared/data && pwd)}"
.venv/bin/python scripts/compare_backends.py data=3bpa 'backends=[grid_chain]' 'seeds=[1,2,3]' budget_s=480 jobs=1 threads=1 tp.options.factors=element out_dir=results/3bpa/factors/element > results/3bpa/factors/element.log 2>&1 &
.venv/bin/python scripts/compare_backends.py data=3bpa 'backends=[grid_chain]' 'seeds=[1,2,3]' budget_s=480 jobs=1 threads=1 tp.options.factors=channel out_dir=results/3bpa/factors/channel > results/3bpa/factors/channel.log 2>&1 &
wait
