# Fresh clone -> `make demo` / `make test`: each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptclip-installed
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: demo test lint venv bench bench-methods clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,export,cpu,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/promptclip demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py --out bench_out

# Base-to-novel on both toy-world splits (name, disjoint), 5 seeds, with the paired tables vs ivlp and zeroshot
# and the pre-issue-13 forms of DiSa / ISP as ablations. Long: see README "The toy world"; resumes when rerun.
BENCH_STEPS ?= 300
BENCH_METHODS ?= zeroshot,coop,ivlp,disa,isp,isp[use_probing=false],isp[probing_normalize=batch],disa[cir_reduction=batchmean],disa[saliency_source=text],disa[mask_small_grid=0],disa[sr_l1_scale=none],disa[cir_reduction=batchmean,saliency_source=text,mask_small_grid=0,sr_l1_scale=none]
bench-methods: $(STAMP)
	$(VENV)/bin/promptclip bench toyworld --protocols base2novel --splits name,disjoint --seeds 1,2,3,4,5 \
		--steps $(BENCH_STEPS) --methods '$(BENCH_METHODS)' --out bench_methods

clean:
	rm -rf demo_out bench_out bench_methods .pytest_cache
