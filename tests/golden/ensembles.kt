# ensembles.kt: ensemble nodes (an ensemble of an ensemble, both ways to combine) and a
# template that decides whether a third ensemble exists and whom it joins.
graph ensembles

data digits { val_split = 300 }

node a   : cnn_tiny [target]
node b   : cnn_small
node c   : mlp      [frozen]
node e   : ensemble(a, b, c)
node f   : ensemble(e, b)  [combine=mean_probs]
node opt : choice(none, ensemble(a, b), ensemble(a, c)) [combine=choice(mean_logits, mean_probs)]

edges label -> * : through
e   -> a : correct kl(T=2)
f   -> b : through kl(T=3)
opt -> a : linear
