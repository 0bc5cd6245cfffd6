"""ltp: Learned Token Pruning (Kim et al., KDD 2022) on a from-scratch RoBERTa / BERT encoder."""
from .model import Config, Model, load, save
from .pruning import PruneConfig
from .text import Tokenizer, collate

__all__ = ["Config", "Model", "PruneConfig", "Tokenizer", "collate", "load", "save"]
