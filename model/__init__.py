"""The reference GPT: config, module, loaders and tokenizers."""

from model.config import PRESETS, GPTConfig
from model.errors import ModelError
from model.gpt import GPT
from model.load import load_model, save_checkpoint
from model.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "ModelError", "Tokenizer", "load_model", "save_checkpoint"]
