"""Section 8, the capstone: one command from data to a served, evaluated, safety-checked assistant.

pipeline.py: named stages cached by a key of their config, code and inputs; interrupted runs resume.
"""
