"""A module whose import blocks while the test holds it (in the thread named "importer"):
a plain fork meanwhile would copy its import lock held, and the child's import of it would
wait for ever."""

import threading

from tests.sys import forkserver_jobs

if threading.current_thread().name == "importer":
    forkserver_jobs.IMPORTING.set()
    forkserver_jobs.FINISH_IMPORT.wait(60)
