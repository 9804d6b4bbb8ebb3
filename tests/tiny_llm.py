"""A tiny random Llama with a character-level BPE tokenizer, saved as a local model folder:
loads and generates in well under a second with transformers, and is accepted by vLLM's
CPU build (head_dim 64, the smallest its CPU attention takes). Used by the transformers
engine tests and the real-vllm tests (tests/test_vllm_cpu.py)."""

from __future__ import annotations

from pathlib import Path

CORPUS = ["User: Annotate entities in 张三在北京工作。", 'Assistant: {"entities": [{"text": "北京"}]}',
          "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 {}[]:,.\"'\n"]


def build_tiny_llm(directory: Path, max_position_embeddings: int = 512) -> Path:
    """Write the tokenizer and a 2-layer random ``LlamaForCausalLM`` (hidden 128, 2 heads of
    64) into ``directory``; returns it. The tokenizer has no chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()  # characters join without spaces
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
