"""Every list of names the library, the API schemas and the CLI share, in one place.

Light on purpose (no imports): the API image imports it without torch. The scorer registry
(``styleinject.eval.scorers.SCORERS``) is keyed by ``SCORER_NAMES`` and a test checks they agree;
fields fixed on resume are marked on ``TrainConfig`` itself (``resume_fixed_fields()``).
"""

from __future__ import annotations

# training kinds: one module each in styleinject/train/ (finetune.py, distill.py, dreambooth.py)
TRAIN_KINDS = ("finetune", "distill", "dreambooth")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DISTILL_TEXT_MODES = ("auto", "shared", "unshared")  # auto: unshared iff the data has teacher_text
# adapter presets (styleinject.adapters.config.PRESET_FIELDS): the paper's text (the defaults) or
# the placement that reproduces its parameter counts (docs/adapters.md)
ADAPTER_PRESETS = ("paper-text", "paper-counts")
A_INITS = ("lora", "mixture")  # StyleInjectConfig.a_init: each A_i like a LoRA A / scaled by sqrt(n)

# evaluation scorers (styleinject.eval.scorers registry keys)
SCORER_NAMES = ("clipscore", "pickscore", "imagereward", "toystyle")
DEFAULT_SELECT_METRIC = "clipscore"  # marks a service job's best checkpoint; every deployment can score it
# keys of evaluate_adapter(scorer_paths=...): a hub id or local folder per model a scorer loads
SCORER_PATH_KEYS = ("clipscore", "pickscore", "pickscore_processor", "imagereward", "imagereward_tokenizer",
                    "toystyle")

# dataset archives accepted everywhere (CLI --data, upload); longest first where one ends another
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
# prompts-only files (distill) and the single-file dataset uploads: archives + prompts files
PROMPTS_SUFFIXES = (".txt", ".jsonl")
DATASET_FILE_SUFFIXES = ARCHIVE_SUFFIXES + PROMPTS_SUFFIXES
