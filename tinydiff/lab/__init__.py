"""The exact lab (docs/lab.md): a synthetic word language whose likelihood, conditionals and masked-diffusion
posteriors are exact at realistic lengths, and the exact evaluation of models and samples on it.
A research instrument beside the lesson: the scripts reach it through `--data lab`; the lesson modules
(model, diffusion, sampling, sdtt, tcs, evaluate) never import it.

    language.py   the language (Lab, LabParams, the spec 'lab:W=...', named PRESETS), the exact denoiser /
                  AR model / TCS targets
    data.py       its tokenizer (labA) and its prepared data folder (--data lab)
    evaluate.py   exact metrics of sample sets and models (true CE, valid words, word TV, bound gap, per rate)
"""
from .language import (LETTERS, PRESETS, Lab, LabParams, OracleAR, OracleDenoiser, canonical_source,  # noqa: F401
                       oracle_targets, parse_spec)
from .data import LabTokenizer, prepare_lab  # noqa: F401
from .evaluate import heldout_gap, lab_metrics, lab_of, lab_table, per_rate, window_word_law, words_of  # noqa: F401
