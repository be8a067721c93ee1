"""The one base class of the problems a user can fix.

Every error jaxcls raises for bad input (a config key, a data set, a workdir, a weights
file, a flag) derives from `JaxclsError` and says what is wrong and how to fix it. The
command-line programs print it as one line, `error: ...`, and exit with status 2.
"""


class JaxclsError(Exception):
  """Bad input or a state on disk that the user can fix; the message says how."""
