"""ltp: Learned Token Pruning (Kim et al., KDD 2022) on a from-scratch RoBERTa / BERT encoder."""
from . import algorithm  # Algorithm 1's steps, for a training loop of your own (README)
from .checkpoint import load, save
from .model import Config, Model
from .pruning import PruneConfig
from .text import Tokenizer, collate

__all__ = ["algorithm", "Config", "Model", "PruneConfig", "Tokenizer", "collate", "load", "save"]
