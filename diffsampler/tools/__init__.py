"""Tools above the library: the solver-schedule search driver, the run spec and runner of the
command line, the results report and minority-classifier training.  A tool may use every layer of
the library; the library never imports a tool."""

from .search import S3Settings, SearchResult, calibration_seeds, search

__all__ = ["search", "SearchResult", "S3Settings", "calibration_seeds"]
