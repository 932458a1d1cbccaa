"""The closed loop: label-shift recalibration of a drifting model into a new version."""
