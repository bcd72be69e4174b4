# Fresh clone -> `make demo` / `make test`: each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptclip-installed
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: demo test lint venv bench bench-image-classes bench-open-set bench-methods bench-disa-parts bench-coop-long \
	bench-guidg-head clean

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

# Classes from 1/2/4/8 example images vs from their names (ordinary and out-of-vocabulary), toy-clip, 5 seeds, 2 styles (~35 s)
bench-image-classes: $(STAMP)
	$(PY) benchmarks/bench_image_classes.py --out bench_image_classes

# open-set answers on the toy world (README "None of these"): AUROC, false accepts at 95% kept, 3 seeds, ~7 min
bench-open-set: $(STAMP)
	$(PY) benchmarks/bench_open_set.py --out bench_out/open_set --seeds 0,1,2

# Base-to-novel on the three toy-world splits (name, disjoint, colour), 5 seeds, with the paired tables vs ivlp and zeroshot
# and the pre-issue-13 forms of DiSa / ISP as ablations (bench_methods/); the DiSa per-part ablations
# (bench_disa_parts/, reusing bench_methods' finished zeroshot / ivlp / disa runs); CoOp against zero-shot on a
# long schedule (bench_coop_long/). Each resumes when rerun.
BENCH_SEEDS ?= 1,2,3,4,5
BENCH_SPLITS ?= name,disjoint,colour
BENCH_STYLES ?= clean,sketch,noisy,lowres,palette
BENCH_STEPS ?= 100
BENCH_METHODS ?= zeroshot,coop,ivlp,disa,isp,isp[use_probing=false],isp[probing_normalize=batch],disa[cir_reduction=batchmean,saliency_source=text,mask_small_grid=0,sr_l1_scale=none]
DISA_PARTS ?= zeroshot,ivlp,disa,disa[cir_reduction=batchmean],disa[saliency_source=text],disa[mask_small_grid=0],disa[sr_l1_scale=none],disa[use_cir=false],disa[use_dir=false],disa[use_sr=false]
COOP_LONG_STEPS ?= 1000
bench-methods: $(STAMP)
	$(VENV)/bin/promptclip bench toyworld --protocols base2novel --splits $(BENCH_SPLITS) --seeds $(BENCH_SEEDS) --styles $(BENCH_STYLES) \
		--steps $(BENCH_STEPS) --methods '$(BENCH_METHODS)' --out bench_methods

bench-disa-parts: $(STAMP)
	mkdir -p bench_disa_parts
	if [ ! -e bench_disa_parts/runs.jsonl ] && [ -e bench_methods/runs.jsonl ]; then \
		cp bench_methods/runs.jsonl bench_disa_parts/; fi
	$(VENV)/bin/promptclip bench toyworld --protocols base2novel --splits $(BENCH_SPLITS) --seeds $(BENCH_SEEDS) --styles $(BENCH_STYLES) \
		--steps $(BENCH_STEPS) --methods '$(DISA_PARTS)' --out bench_disa_parts

bench-coop-long: $(STAMP)
	$(VENV)/bin/promptclip bench toyworld --protocols base2novel --splits $(BENCH_SPLITS) --seeds $(BENCH_SEEDS) --styles $(BENCH_STYLES) \
		--steps $(COOP_LONG_STEPS) --methods zeroshot,coop --out bench_coop_long

# GuiDG's expert-weighting head: the official form, a head with its own lr and a temperature ([R]), and uniform
# weights, side by side in leave-one-style-out multi-source DG (bench_guidg_head/; ~15 min alone on 2 cores)
GUIDG_HEAD_METHODS ?= guidg,guidg[head_lr=0.001,head_temperature=0.07],guidg[weighting=uniform]
bench-guidg-head: $(STAMP)
	$(VENV)/bin/promptclip bench toyworld --protocols loso --seeds 1,2,3 --loso-methods '$(GUIDG_HEAD_METHODS)' \
		--out bench_guidg_head

clean:
	rm -rf demo_out bench_out bench_image_classes bench_methods bench_disa_parts bench_coop_long bench_guidg_head .pytest_cache
