from .scheduling_dmmd import DMMDScheduler, DMMDSchedulerOutput

__all__ = ["DMMDScheduler", "DMMDSchedulerOutput"]
