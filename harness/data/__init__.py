"""Edit cases and text corpora: one :class:`EditCase` type, loaders for every supported format."""
from .case import EditCase
from .corpus import default_ppl_corpus, default_stats_corpus, load_texts
from .loaders import (DataError, LoadedCases, SkippedRecord, SkippedRecordsWarning, load_cases, load_counterfact_rome,
                      load_easyedit, load_hardedit, load_zsre, resolve_data_dir, save_easyedit)
from .knowedit import load_knowedit          # registers --dataset knowedit:FILE
from .qaedit import load_qaedit, load_zsre_qa  # registers --dataset qaedit, zsre-qa

__all__ = [
    "EditCase", "DataError", "LoadedCases", "SkippedRecord", "SkippedRecordsWarning", "load_cases", "load_texts",
    "load_counterfact_rome", "load_easyedit", "load_hardedit", "load_zsre", "load_qaedit", "load_zsre_qa",
    "load_knowedit", "save_easyedit", "resolve_data_dir",
    "default_ppl_corpus", "default_stats_corpus",
]
