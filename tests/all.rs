//! Black-box tests of proxytune, in one test binary so lance and libtorch are linked once.

mod cli;
mod corpus;
mod daemon;
mod demo;
mod filter;
mod job;
mod metrics;
mod pylance;
mod runtime;
mod scorers;
mod student;
mod supervisor;
mod support;
mod world_folders;
