//! torchreid's RandomIdentitySampler (P identities x K instances per batch), as PLR-OSNet trains
//! with it (P = 16, K = 4).

use crate::error::{Error, Result};
use crate::rng::Rng;

pub struct RandomIdentitySampler {
    /// Dataset indices of each label, in dataset order.
    by_label: Vec<Vec<usize>>,
    num_ids: usize,
    num_instances: usize,
}

impl RandomIdentitySampler {
    /// `labels[i]` is the training label (0..K-1) of dataset item i.
    pub fn new(labels: &[usize], num_ids: usize, num_instances: usize) -> Result<Self> {
        if num_ids == 0 || num_instances == 0 {
            return Err(Error::msg("sampler: identities and instances per batch must be positive"));
        }
        let num_labels = labels.iter().max().map_or(0, |&m| m + 1);
        let mut by_label = vec![Vec::new(); num_labels];
        for (i, &l) in labels.iter().enumerate() {
            by_label[l].push(i);
        }
        by_label.retain(|v| !v.is_empty());
        if by_label.len() < num_ids {
            return Err(Error::msg(format!(
                "sampler: the training set has {} identities, fewer than the {num_ids} identities a batch needs",
                by_label.len()
            )));
        }
        Ok(RandomIdentitySampler { by_label, num_ids, num_instances })
    }

    pub fn batch_size(&self) -> usize {
        self.num_ids * self.num_instances
    }

    /// One epoch: batches of `num_ids` distinct identities x `num_instances` images each.
    pub fn epoch(&self, rng: &mut Rng) -> Vec<Vec<usize>> {
        let k = self.num_instances;
        // Chunks of k indices per identity, each identity's list shuffled first; identities with
        // fewer than k images are filled with replacement; a trailing partial chunk is dropped.
        let mut chunks: Vec<Vec<Vec<usize>>> = self
            .by_label
            .iter()
            .map(|idxs| {
                let mut idxs = if idxs.len() < k { (0..k).map(|_| idxs[rng.below(idxs.len())]).collect() } else { idxs.clone() };
                rng.shuffle(&mut idxs);
                let mut c: Vec<Vec<usize>> = idxs.chunks_exact(k).map(<[usize]>::to_vec).collect();
                c.reverse(); // popped from the back, so the first chunk comes out first
                c
            })
            .collect();
        let mut available: Vec<usize> = (0..chunks.len()).collect();
        let mut batches = Vec::new();
        while available.len() >= self.num_ids {
            // random.sample: num_ids distinct entries, in draw order (partial Fisher-Yates).
            for i in 0..self.num_ids {
                let j = i + rng.below(available.len() - i);
                available.swap(i, j);
            }
            let selected: Vec<usize> = available[..self.num_ids].to_vec();
            let mut batch = Vec::with_capacity(self.batch_size());
            for &l in &selected {
                batch.extend(chunks[l].pop().expect("available identities have chunks left"));
            }
            available.retain(|&l| !chunks[l].is_empty());
            batches.push(batch);
        }
        batches
    }

    /// torchreid's `__len__` estimate in images: sum over identities of max(n, K) rounded down to
    /// a multiple of K.
    pub fn len_estimate(&self) -> usize {
        self.by_label.iter().map(|v| v.len().max(self.num_instances) / self.num_instances * self.num_instances).sum()
    }
}
