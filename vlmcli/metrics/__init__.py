"""Evaluation metrics, pure Python (no model, numpy or native imports at import time).

vqa        VQAv2 accuracy and answer normalisation (the official vqaEval.py's behaviour)
tokenize   the PTB tokenizer's effect on captions (pycocoevalcap's Java tokenizer, in Python)
caption    CIDEr-D, BLEU-1..4, ROUGE-L as pycocoevalcap's scorers compute them
retrieval  image<->text Recall@K; zero-shot top-k accuracy
"""
