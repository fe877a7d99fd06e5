"""dmrx: a toolkit for the Deep Match to Rank (DMR) click-through-rate model."""

__version__ = "0.1.0"
