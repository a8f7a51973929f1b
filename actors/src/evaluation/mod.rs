//! The evaluation: the DreamBench protocol ([`dreambench`]: subjects, prompts, subsets, the
//! real-images row, any [`dreambench::Generator`] scored with the same seeds) and the two models
//! it compares as generators ([`generators`]: the supervisor and the student).

pub mod dreambench;
pub mod generators;
