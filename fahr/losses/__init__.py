"""Training losses (survival: Cox partial likelihood; age: L1 and label distribution)."""
