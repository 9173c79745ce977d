"""Kaplan-Meier curves by group, with the numbers at risk below the axes (lifelines + matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fahr.utils.atomic import atomic_write


def plot_km_by_group(time: pd.Series, event: pd.Series, groups: pd.Series, order: list[str], path: str | Path,
                     title: str, time_unit: str = "days") -> Path:
    """One KM curve per group in ``order``; numbers at risk tabulated under the plot; PNG at ``path``.

    Args:
        time: follow-up per subject, in ``time_unit``.
        event: 1 = event, 0 = censored.
        groups: group label per subject (e.g. "Q1".."Q4").
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    fig, ax = plt.subplots(figsize=(7, 5.5))
    try:
        fitters = []
        for label in order:
            inside = groups == label
            kmf = KaplanMeierFitter(label=f"{label} (n={int(inside.sum())})")
            kmf.fit(time[inside], event[inside])
            kmf.plot_survival_function(ax=ax, ci_show=False)
            fitters.append(kmf)
        ax.set_title(title)
        ax.set_xlabel(f"time since photo ({time_unit})")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.02)
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
        fig.tight_layout()
        return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=120, metadata={"Software": None}),
                            mode="wb")
    finally:
        plt.close(fig)
