"""ltp: Learned Token Pruning (Kim et al., KDD 2022) on a from-scratch RoBERTa / BERT encoder."""
from .checkpoint import load, save
from .model import Config, Model
from .pruning import PruneConfig
from .text import Tokenizer, collate

__all__ = ["Config", "Model", "PruneConfig", "Tokenizer", "collate", "load", "save"]
