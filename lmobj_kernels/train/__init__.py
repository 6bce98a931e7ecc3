"""The small trainer: GPT (causal LM), BERT (masked LM) and T5 (span corruption) side by side.

data.py (tokenizer, corpus, batches), models.py (the three models), objectives.py (corruption per objective),
kernels.py (the library's attention, losses and corruption ops, and the baseline's),
loop.py (training, evaluation, demos).
"""
