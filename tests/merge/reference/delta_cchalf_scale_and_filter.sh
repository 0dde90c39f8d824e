#!/bin/sh
# DIALS 3.12 scale-and-filter run whose scale_and_filter_results.json is stored beside this
# script as delta_cchalf_scale_and_filter_results.json (the JSON layout reference for
# jaxscale.merge.delta_cchalf.scale_and_filter_results). Takes ~5 min on 2 cores.
#   sh delta_cchalf_scale_and_filter.sh /path/to/shared/data/lcys_4sweep_dials/reference_dials3.12_scale
set -e
D=$1
dials.scale "$D/scaled.refl" "$D/scaled.expt" filtering.method=deltacchalf \
  filtering.deltacchalf.mode=image_group filtering.deltacchalf.group_size=100 \
  filtering.deltacchalf.stdcutoff=1.5 filtering.deltacchalf.max_cycles=2 output.html=None
cp scale_and_filter_results.json delta_cchalf_scale_and_filter_results.json
