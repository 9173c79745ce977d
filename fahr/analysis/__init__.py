"""Analyses of trained face models on aligned crops: robustness to perturbations, saliency maps."""
