//! # lazylayer-fanotify: the fanotify pre-content interface
//!
//! The syscall boundary of the fanotify frontend (Linux 6.14+, store on ext4, XFS or btrfs):
//! a [`Group`] of class pre-content, its inode marks, the permission events it reads (with
//! their range records) and the answers written back, and a probe of whether a directory's
//! filesystem takes pre-content marks. What the daemon does with the events (who waits, what
//! is filled, who keeps the group open) lives in `lazylayer-daemon`. The kernel behaviour this
//! relies on is in docs/kernel.md.

pub mod group;

pub use group::{Answer, Event, Group, supports_pre_content};
