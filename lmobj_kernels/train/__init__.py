"""The small trainer: GPT (causal LM), BERT (masked LM) and T5 (span corruption) side by side.

data.py (tokenizer, corpus, batches), models.py (the three models), objectives.py (corruption per objective),
kernels.py (the library's attention and corruption ops, or stand-ins), loop.py (training, evaluation, demos).
"""
