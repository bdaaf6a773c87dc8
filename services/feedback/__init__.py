"""The reader-feedback loop: verdicts on detection candidates grow a training manifest with reader
sphere labels (true positives) and hard negatives (false positives). See docs/feedback.md."""
