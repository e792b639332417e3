"""The synthetic-user testbed: PPD end to end on a miniature Stage C, on a CPU, in minutes.

Run it with ``ppd-diffusers testbed --quick``; see ``docs/guides/testbed.md``.
"""
