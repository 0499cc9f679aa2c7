"""Summaries of per-seed figures for the benches: mean ± standard deviation, and whether a
paired difference is beyond two standard errors of its mean."""

import math
import statistics


def mean_std(values: list[float], scale: float = 1.0, digits: int = 5) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def beyond_two_se(differences: list[float], sign: int = 0) -> str:
    """"yes" if the mean difference is beyond 2 standard errors: below 0 (sign -1), above 0
    (sign 1), or either way (sign 0); "-" with fewer than two pairs."""
    if len(differences) < 2:
        return "-"
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    mean = statistics.mean(differences)
    beyond = mean < -2 * se if sign < 0 else mean > 2 * se if sign > 0 else abs(mean) > 2 * se
    return "yes" if beyond else "no"
