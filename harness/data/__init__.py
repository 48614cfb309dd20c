"""Edit cases and text corpora: one :class:`EditCase` type, loaders for every supported format."""
from .case import EditCase
from .corpus import default_ppl_corpus, default_stats_corpus, load_texts
from .loaders import (DataError, LoadedCases, SkippedRecord, SkippedRecordsWarning, load_cases, load_counterfact_rome,
                      load_easyedit, load_hardedit, load_zsre, resolve_data_dir, save_easyedit)

__all__ = [
    "EditCase", "DataError", "LoadedCases", "SkippedRecord", "SkippedRecordsWarning", "load_cases", "load_texts",
    "load_counterfact_rome", "load_easyedit", "load_hardedit", "load_zsre", "save_easyedit", "resolve_data_dir",
    "default_ppl_corpus", "default_stats_corpus",
]
