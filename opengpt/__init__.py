"""The helpers of Open GPT Training: what two or more of the top-level scripts share.

The rule: modules here import each other and the top-level modules (model.py, sophia.py,
configurator.py), never a script a user runs (prepare.py, train.py, sample.py, export.py, ...).
"""
