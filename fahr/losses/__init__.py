"""Training losses (survival: Cox partial likelihood; age: L1 and label distribution)."""

from fahr.losses.age import gaussian_label_distribution, l1_age_loss, label_distribution_loss
from fahr.losses.cox import CoxPHLoss, cox_ph_loss, gather_for_cox

__all__ = ["CoxPHLoss", "cox_ph_loss", "gather_for_cox", "gaussian_label_distribution", "l1_age_loss",
           "label_distribution_loss"]
