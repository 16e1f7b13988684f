//! The named parameter store. Names are the PyTorch state-dict keys of the official model, so
//! export and import are a table lookup.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

pub type ParamId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Trained by the optimizer.
    Param,
    /// Float state that is not trained (BatchNorm running mean and variance).
    Buffer,
    /// BatchNorm's `num_batches_tracked`: an int64 scalar in PyTorch, kept here as a [] f32 count.
    Counter,
}

pub struct Entry {
    pub name: String,
    pub value: Tensor,
    pub kind: Kind,
}

#[derive(Default)]
pub struct ParamStore {
    entries: Vec<Entry>,
    by_name: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, value: Tensor, kind: Kind) -> Result<ParamId> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(Error::msg(format!("parameter {name} registered twice")));
        }
        let id = self.entries.len();
        self.by_name.insert(name.clone(), id);
        self.entries.push(Entry { name, value, kind });
        Ok(id)
    }

    pub fn id(&self, name: &str) -> Result<ParamId> {
        self.by_name.get(name).copied().ok_or_else(|| Error::msg(format!("no parameter named {name}")))
    }

    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.entries[id].value
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut Tensor {
        &mut self.entries[id].value
    }

    /// Replaces a value, checking that the shape is unchanged.
    pub fn set(&mut self, id: ParamId, value: Tensor) -> Result<()> {
        let e = &mut self.entries[id];
        if e.value.shape() != value.shape() {
            return Err(Error::shape("ParamStore::set", format!("{}: shape {:?} != {:?}", e.name, value.shape(), e.value.shape())));
        }
        e.value = value;
        Ok(())
    }

    pub fn entry(&self, id: ParamId) -> &Entry {
        &self.entries[id]
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ids of the trained parameters, in registration order.
    pub fn trainable(&self) -> impl Iterator<Item = ParamId> + '_ {
        self.entries.iter().enumerate().filter(|(_, e)| e.kind == Kind::Param).map(|(i, _)| i)
    }

    /// Number of trained scalars whose names pass `filter`.
    pub fn count_params(&self, filter: impl Fn(&str) -> bool) -> usize {
        self.entries.iter().filter(|e| e.kind == Kind::Param && filter(&e.name)).map(|e| e.value.numel()).sum()
    }

    /// Moves every tensor to `device`, except the counters: they stay on the CPU, where BatchNorm
    /// increments them each training step without waiting for the GPU.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        for e in &mut self.entries {
            if e.kind != Kind::Counter {
                e.value = e.value.to_device(device)?;
            }
        }
        Ok(())
    }
}
