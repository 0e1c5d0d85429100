"""Batch mode: the provider batch APIs (half price, answers within hours), each behind one transport."""
