"""In-repo baselines that follow published procedures as their original code runs them.

They exist to be measured against in the same run (``benches/``) and to check that fastrome
computes the same quantities; they are not meant for production use.
"""
