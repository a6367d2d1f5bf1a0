"""Builds the cffi extension vcpu_worker._kvm during install (cffi_modules has no pyproject form)."""
from setuptools import setup

setup(cffi_modules=["vcpu_worker/kvm_build.py:ffibuilder"])
