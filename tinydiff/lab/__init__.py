"""The exact lab (docs/lab.md): a synthetic word language whose likelihood, conditionals and masked-diffusion
posteriors are exact at realistic lengths, and the exact evaluation of models and samples on it.
A research instrument beside the lesson: the scripts reach it through `--data lab`; the lesson modules
(model, diffusion, sampling, sdtt, tcs, evaluate) never import it.

    language.py   the language (Lab, LabParams, the spec 'lab:W=...'), its tokenizer, its prepared data,
                  the exact denoiser / AR model / TCS targets
    evaluate.py   exact metrics of sample sets and models (true CE, valid words, word TV, bound gap, per rate)
"""
from .language import (LETTERS, PRESETS, Lab, LabParams, LabTokenizer, OracleAR, OracleDenoiser,  # noqa: F401
                       canonical_source, oracle_targets, parse_spec, prepare_lab)
from .evaluate import heldout_gap, lab_metrics, lab_of, lab_table, per_rate, window_word_law, words_of  # noqa: F401
