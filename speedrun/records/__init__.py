"""Records and the leaderboard, computed from run logs.

Layout::

    records/<track>/<YYYY-MM-DD>_<slug>/record.json   title, authors, date, track, beats, kind, description
                                        README.md     the author's write-up
                                        runs/         <run_id>.txt + <run_id>.json of EVERY run launched
    records/upstream/                                  public modded-nanogpt logs imported for comparison, and
                                                       history.csv, the public record history (for reference)

Modules: ``runlog`` (the run log format, parsed once, and one run's checks), ``check`` (records and the whole
tree), ``stats`` (the tests, from scipy.stats), ``board`` and ``page`` (what ``build`` writes), ``submit``,
``upstream``, ``compare``, ``reproduce`` and ``cli`` (the ``leaderboard.py`` command line).
"""
