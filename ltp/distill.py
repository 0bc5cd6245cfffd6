"""
Knowledge distillation of section 4.6: the student (the pruned, int8 model being trained) learns from the
unpruned floating-point teacher (the fine-tuned model), which runs without gradients, pruning or dropout.
The paper gives the loss in words: it "matches the output logits of the classification layer and the output
representations of the embedding layer" of the teacher, and the objective is "a convex combination of the
original loss and the knowledge distillation loss". Written out here, as eq. 16 (numbered after eqs. 14-15 of
pruning.py):

  L = (1 - alpha) L_task + alpha (L_logits + L_emb)                                       (eq. 16)
  L_logits = KL(softmax(z_t) || softmax(z_s))   (Hinton et al. 2015 at temperature 1; a regression head: (z_s - z_t)^2)
  L_emb    = || e_s - e_t ||^2 / C, averaged over each sequence's real tokens

z the head's logits, e (B, N, C) the embedding layer's output (after its LayerNorm), s student, t teacher. Each
term is a mean over the batch's sequences, like the task loss, so that shares of a batch add up (train.py).
"""
import torch.nn.functional as F


def distill_loss(logits, teacher_logits, emb, teacher_emb, attention_mask):
    """
    L_logits + L_emb of eq. 16 for a batch: logits (B, K) (K = 1: regression), emb (B, N, C), attention_mask
    (B, N) 1 for real tokens. Example: K = 2, z_s = [0, 0], z_t = [ln 3, 0] (teacher 3:1), emb equal ->
    KL = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.1308.
    """
    if logits.shape[1] == 1:
        l_logits = F.mse_loss(logits.float(), teacher_logits.float())
    else:  # KL(teacher || student), per sequence summed over classes, then the batch mean
        l_logits = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                            log_target=True, reduction="batchmean")
    real = attention_mask.float()                                                       # (B, N)
    per_token = (emb.float() - teacher_emb.float()).pow(2).mean(-1)                     # (B, N): ||e_s - e_t||^2 / C
    l_emb = ((per_token * real).sum(1) / real.sum(1).clamp_min(1)).mean()
    return l_logits + l_emb
