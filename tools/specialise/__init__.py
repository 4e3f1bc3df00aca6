"""Specialisation, S4-S6 of the conversion loop: select a base model for a task, train a
LoRA adapter on the task's logged answers, and gate it against the incumbent.

    data.py      exported examples -> typed `Example`s, their fingerprint
    train.py     S5: a LoRA adapter on the chosen base (torch, peft), resumable
    evaluate.py  S4 and S6: a model (and adapter) on held-out examples, in llama.cpp
    gate.py      S6: the paired test that decides promotion

Training needs the `train` extra (torch, transformers, peft, accelerate); a serving
device does not install it.
"""
