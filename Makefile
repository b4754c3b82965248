# pipeline: every stage is a file target, so `make` rebuilds only what changed.
# `make help` lists the targets and the variables you can set (make all WNIDS="..." URLS=...).
PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
PIPELINE  := $(BIN)/pipeline
STAMP     := $(VENV)/.installed-stamp
SETUP     ?= $(STAMP)#  what chain targets need first; SETUP= uses an environment as it is

## Chain variables (override on the command line)
WNIDS     ?= n02123045 n02123159#  synsets to gather (one class each)
URLS      ?= fall11_urls.txt#      ImageNet URL list: <wnid>_<num><TAB><url>
WORDS     ?=#                      words.txt for human-readable class names (optional)
ARCH      ?= alexnet#              alexnet, vgg11 ... vgg19, *_bn
WEIGHTS   ?= imagenet#             imagenet, none, or a .pt/.pth file
FREEZE    ?= conv4#                freeze this layer and all below it (none = train all)
EPOCHS    ?= 10#                   training epochs
LIMIT     ?=#                      exactly this many good images per synset (optional)
VAL_RATIO ?= 0.1#                  share of each class held out for validation
RUN       ?= $(ARCH)-$(FREEZE)#    run name: results go to $(RUNS)/$(RUN)/
DATA      ?= data#                 downloaded and derived data
MANIFESTS ?= manifests#            train/val manifests and the label map
RUNS      ?= runs#                 training runs
SIZE      ?= 256#                  images are packed at SIZE x SIZE (shorter side + center crop)
CROP      ?= 224#                  network input size
BATCH     ?= 32#                   batch size
LR        ?= 0.01#                 learning rate of the new fc8 (see pipeline finetune --help)
MEAN      ?= auto#                 normalization: auto, imagenet, or $(DATA)/mean.npy
COMPARE   ?=#                      other run folders to plot in the report
GATHER_ARGS   ?=#                  extra options for pipeline gather
FINETUNE_ARGS ?=#                  extra options for pipeline finetune
PACK_ARGS     ?=#                  extra options for pipeline pack (--encoding jpeg, --shard-size N)

RAW    := $(DATA)/raw
RUNDIR := $(RUNS)/$(strip $(RUN))
LABELS := $(MANIFESTS)/train.txt $(MANIFESTS)/val.txt $(MANIFESTS)/labels.txt

.DEFAULT_GOAL := help
.PHONY: help setup test lint demo all gather validate label card mean pack finetune evaluate \
        report clean distclean

help: ## List targets and variables
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables (NAME=default; set them on the command line):"
	@grep -E '^[A-Z_]+ +\?=.*#' $(MAKEFILE_LIST) \
	  | sed -E 's/^([A-Z_]+) +\?= *([^#]*)# *(.*)$$/\1=\2\t\3/' \
	  | awk -F'\t' '{printf "  %-30s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -e '.[dev]'
	touch $@

setup: $(STAMP) ## Create .venv and install the project (editable) with dev tools

test: setup ## Run the test suite, then the linter
	$(BIN)/python -m pytest
	$(BIN)/ruff check pipeline scripts tests

lint: setup ## ruff
	$(BIN)/ruff check pipeline scripts tests

demo: setup ## The whole chain offline on the embedded sample, into demo/ (WEIGHTS=imagenet: cached)
	$(BIN)/python scripts/demo.py \
	  $(if $(and $(filter command line,$(origin WEIGHTS)),$(filter imagenet,$(WEIGHTS))),--weights imagenet)

all: report card ## gather -> validate -> label (-> card) -> mean -> pack -> finetune -> evaluate -> report

# The wnid list is a file rewritten (at parse time) only when WNIDS changes, so gather re-runs
# only then and an unchanged chain stays up to date for `make -q`.
CHAIN_GOALS := all gather validate label card mean pack finetune evaluate report
ifneq ($(filter $(CHAIN_GOALS),$(MAKECMDGOALS)),)
ifneq ($(strip $(file < $(DATA)/wnids.txt)),$(strip $(WNIDS)))
$(shell mkdir -p $(DATA) && printf '%s\n' $(WNIDS) > $(DATA)/wnids.txt)
endif
endif

$(DATA)/.gathered: $(DATA)/wnids.txt $(URLS) | $(SETUP)
	$(PIPELINE) gather --urls $(URLS) --wnids-file $(DATA)/wnids.txt --out $(RAW) \
	  $(if $(strip $(LIMIT)),--limit $(strip $(LIMIT))) \
	  $(if $(strip $(WORDS)),--words $(strip $(WORDS))) $(GATHER_ARGS)
	touch $@

$(DATA)/.validated: $(DATA)/.gathered
	$(PIPELINE) validate $(RAW) --quarantine $(DATA)/rejected --report $(DATA)/validate.jsonl
	touch $@

$(LABELS) &: $(DATA)/.validated
	$(PIPELINE) label $(RAW) --out $(MANIFESTS) --val-ratio $(strip $(VAL_RATIO)) $(if $(strip $(WORDS)),--words $(strip $(WORDS)))

$(MANIFESTS)/croissant.json: $(LABELS)
	$(PIPELINE) card $(MANIFESTS)

$(DATA)/mean.npy: $(MANIFESTS)/train.txt
	$(PIPELINE) mean $< --size $(SIZE) --out $@

$(DATA)/%.h5: $(MANIFESTS)/%.txt
	$(PIPELINE) pack $< --size $(SIZE) --out $@ $(PACK_ARGS)

# An interrupted run (checkpoint, no metrics yet) is resumed; a finished one is kept as
# $(RUNDIR).previous before training again.
$(RUNDIR)/metrics.json: $(DATA)/train.h5 $(DATA)/val.h5 $(filter %.npy,$(MEAN))
	@if [ -f $(RUNDIR)/checkpoint.pt ] && [ ! -f $@ ]; then echo "resuming $(RUNDIR)"; \
	elif [ -d $(RUNDIR) ]; then rm -rf $(RUNDIR).previous && mv $(RUNDIR) $(RUNDIR).previous; fi
	$(PIPELINE) finetune --train $(DATA)/train.h5 --val $(DATA)/val.h5 --arch $(strip $(ARCH)) \
	  --weights $(strip $(WEIGHTS)) --freeze-until $(strip $(FREEZE)) --epochs $(strip $(EPOCHS)) \
	  --batch-size $(strip $(BATCH)) --lr $(strip $(LR)) --crop $(strip $(CROP)) \
	  --resize $(strip $(SIZE)) --mean $(strip $(MEAN)) --out $(RUNDIR) \
	  $$([ -f $(RUNDIR)/checkpoint.pt ] && echo --resume) $(FINETUNE_ARGS)

$(RUNDIR)/eval-val/eval.json: $(RUNDIR)/metrics.json
	$(PIPELINE) evaluate $(RUNDIR)/best.pt $(DATA)/val.h5 --out $(RUNDIR)/eval-val

$(RUNDIR)/report.html: $(RUNDIR)/eval-val/eval.json $(DATA)/mean.npy
	$(PIPELINE) report $(RUNDIR) --mean-image $(DATA)/mean.png $(foreach r,$(COMPARE),--compare $(r))

gather: $(DATA)/.gathered ## Download the synsets' images into $(DATA)/raw
validate: $(DATA)/.validated ## Decode everything, quarantine the unreadable
label: $(LABELS) ## Write the train/val manifests and the label map
card: $(MANIFESTS)/croissant.json ## Write the dataset's Croissant card (sources, what was left out)
mean: $(DATA)/mean.npy ## Compute the mean image
pack: $(DATA)/train.h5 $(DATA)/val.h5 ## Pre-decode train/val into HDF5
finetune: $(RUNDIR)/metrics.json ## Fine-tune $(ARCH) into $(RUNS)/$(RUN)
evaluate: $(RUNDIR)/eval-val/eval.json ## Evaluate best.pt on the validation set
report: $(RUNDIR)/report.html ## Write $(RUNS)/$(RUN)/report.html

clean: ## Remove derived data (manifests, mean, packs, runs); keeps downloaded images
	rm -rf $(MANIFESTS)/*.txt $(MANIFESTS)/quality.csv $(MANIFESTS)/.label-cache.json \
	  $(MANIFESTS)/croissant.json $(MANIFESTS)/images.csv \
	  $(DATA)/mean.* $(DATA)/*.h5 $(DATA)/.validated $(RUNS)

distclean: clean ## Also remove downloaded images, quarantine, demo/ and .venv
	rm -rf $(DATA)/raw $(DATA)/rejected $(DATA)/*.jsonl $(DATA)/.gathered $(DATA)/wnids.txt \
	  demo $(VENV)
