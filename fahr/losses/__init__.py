"""Training losses (survival: Cox partial likelihood; age: L1 and label distribution)."""

from fahr.losses.cox import CoxPHLoss, cox_ph_loss, gather_for_cox

__all__ = ["CoxPHLoss", "cox_ph_loss", "gather_for_cox"]
